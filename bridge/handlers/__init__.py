"""Built-in handler modules.  ``core`` is always loaded; ``diagnostics`` behind ``--diagnostics``."""
