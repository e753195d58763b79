"""Built-in session policy plugins (recipient validation and friends)."""
