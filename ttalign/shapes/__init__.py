"""The shapes world: a synthetic text-to-image world with an exact verifier and a small trained model."""
