"""`python -m distlstm.prep`: see distlstm/data/prep/prep.py."""
from distlstm.data.prep.prep import main
if __name__ == "__main__":
    raise SystemExit(main())
