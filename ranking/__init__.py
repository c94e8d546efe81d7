"""ranking: evidence from receipts, personalised trust, G-Rank gossip (future issues)."""
