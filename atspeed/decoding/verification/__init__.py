"""Verification: the tree forward, the acceptance walk and its rules (strict, relaxed, recursive exact)."""
