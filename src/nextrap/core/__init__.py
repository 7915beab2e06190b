"""Value types and pure math, at the bottom of the package: errors, the move and its backtest terms, rank-1 SVDs, the method names."""
