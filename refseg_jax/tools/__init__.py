"""Tools: commands that check a run's guarantees rather than train."""
