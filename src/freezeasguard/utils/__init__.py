"""Infrastructure every layer uses: atomic files and run directories, image grids, figures."""
