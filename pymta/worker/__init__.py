"""The disk worker: a generic child process for batched calls, and the batching pipeline.

Knows neither the spool nor delivery: they name the functions the child runs.
"""
