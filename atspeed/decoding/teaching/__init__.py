"""Teaching: the target's beams and distributions that draft alignment learns from."""
