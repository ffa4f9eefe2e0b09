"""The pieces of the detect_moe pass: structural candidates, expert layouts, graph features, the proof."""
