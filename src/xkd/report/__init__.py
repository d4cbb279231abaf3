"""Records on disk and the HTML report rendered from them."""
