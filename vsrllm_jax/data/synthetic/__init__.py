"""The synthetic GRID-style lip-reading data set, and synthetic clips in LRS3's layout."""
