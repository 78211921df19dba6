"""tagrelay's engine: intake, rules, consent, dedup, storage and delivery. Knows no ad platform."""

__version__ = "0.1.0"
