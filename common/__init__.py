"""What every layer shares, none of it importing torch as it loads (common.hardware asks torch
about a GPU only when called): errors, atomic files, the machine, command-line exits and
progress, allocator settings, compile modes."""
