"""Lightning callbacks: exporting trained models, writing predictions, reporting results."""
