"""`python -m distlstm.data.prep`: the same command as `python -m distlstm.prep`."""
from distlstm.data.prep.prep import main

raise SystemExit(main())
