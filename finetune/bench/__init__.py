"""The evaluation harness: benchmark specs (`eval/*.yaml`), their runner, scorers and result files."""
