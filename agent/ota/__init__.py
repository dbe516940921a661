"""Over-the-air agent releases: signed bundles, A/B install, boot-counter rollback (docs/ota.md)."""
