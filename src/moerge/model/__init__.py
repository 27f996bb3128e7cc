"""moerge.model: expert layers injected into a base model (`attach` / `detach`)."""
