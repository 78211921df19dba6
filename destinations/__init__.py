"""Destination adapters. The built-ins are plugins like any other (see :mod:`destinations.base`)."""
