"""Medical entity linking: tasks (data side) and metrics. Kept light: no torch import here."""
