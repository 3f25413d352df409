"""The Invoke edge's helpers: the one-line error wrapper, shared flag help, run management tasks."""
