"""Training with trajectory recording, and exact replay of recorded runs."""
