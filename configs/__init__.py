"""The shipped configuration files (package data): stagecast.engine.resources reads them."""
