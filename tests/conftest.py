"""Suite-wide settings. Each folder mirrors a part of the tree: core/, adapters/, server/, monitoring/."""
