"""Operating points of one run (snapshots, DreamBlend combinations), their Pareto front in (CLIP-T, DINO), the
choice of what ships, and the leaderboard across runs."""
