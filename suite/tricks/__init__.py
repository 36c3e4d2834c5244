"""Training and inference techniques as plug-ins (see ``registry``)."""
