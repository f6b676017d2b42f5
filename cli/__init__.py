"""clipdex command-line interface (Typer). Thin: parse arguments, call the library, render."""
