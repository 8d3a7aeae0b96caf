"""Weight files and key mapping: one pure mapping function per source format."""
