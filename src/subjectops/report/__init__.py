"""HTML report of an evaluation run."""
