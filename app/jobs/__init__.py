"""Long jobs the CLI starts (the compress job); they may use vit, train, store and bench."""
