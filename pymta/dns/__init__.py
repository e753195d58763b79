"""DNS for pymta: one resolver object shared by relay (MX) and policy (SPF, DNSBL)."""
