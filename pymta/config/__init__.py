"""Configuration: the embedded default, the TOML loader and its model."""
