"""`python -m distlstm.prep`: see distlstm/data/prep.py."""
from distlstm.data.prep import main
if __name__ == "__main__":
    raise SystemExit(main())
