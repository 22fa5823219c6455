"""What every layer shares and nothing heavy: errors, atomic files, the machine, CLI exits."""
