"""What makes several Warren nodes one broker: the replicated state machine, placement, links."""
