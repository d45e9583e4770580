"""Reading results (never torch or impl/): the HTML report, compare, history, explain."""
