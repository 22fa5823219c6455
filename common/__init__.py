"""What every layer shares, none of it torch: errors, atomic files, the machine, command-line
exits and progress, allocator settings, compile modes."""
