"""pytest plugin for retain plugin authors (filled in by the plugin framework)."""
