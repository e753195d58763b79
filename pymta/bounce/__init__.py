"""Delivery status notifications (RFC 3464): bounces, delay warnings, success reports."""
