"""Planning: tree budgets from measured forward costs (``budget: auto``)."""
