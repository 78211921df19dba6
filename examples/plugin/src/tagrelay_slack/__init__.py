"""tagrelay-slack: post tagrelay events to a Slack channel through an incoming webhook.

An example of an out-of-tree destination plugin. The package registers :class:`Slack` under the
``tagrelay.destinations`` entry-point group (see this package's ``pyproject.toml``), so after
``pip install`` a rule file can say ``type: slack``.
"""

from __future__ import annotations

from tagrelay_slack.destination import DEFAULT_TEMPLATE, MAX_TEXT, Slack

__all__ = ["DEFAULT_TEMPLATE", "MAX_TEXT", "Slack"]
