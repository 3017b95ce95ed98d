"""`python -m sdlora.cli ...`: the same as the `sdlora` command."""

from sdlora.cli import main

raise SystemExit(main())
