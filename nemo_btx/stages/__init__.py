"""One driver per pipeline stage. Stages never import each other: they share only files."""
