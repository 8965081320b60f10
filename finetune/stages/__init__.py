"""One module per stage type; each checks its inputs (no model load) and runs a TRL trainer."""
