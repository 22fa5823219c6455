"""The repository's commands beyond training, and the checkout they run from."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: git asks it, scripts run from it
