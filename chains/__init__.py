"""The shipped chains (package data): stagecast.engine.resources reads them."""
