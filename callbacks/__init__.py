"""Lightning callbacks for ctt runs."""
