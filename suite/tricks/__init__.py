"""Training techniques as plug-ins, one package each, registered through ``suite.registry``."""
