# Shared by the CPU benchmark scripts (sourced): `median` of numbers on stdin, one a line;
# `field NAME` reads NAME=value from an `lmx benchmark` or peer line on stdin.
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
