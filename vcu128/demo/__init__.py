"""The tiny demo model main.sh trains when no model is given."""
