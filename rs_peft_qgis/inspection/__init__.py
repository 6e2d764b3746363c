"""Change inspection: step through result polygons biggest first, accept or reject each (`inspector`), the
verdicts kept in the layer's own file and exported as labels for the next fine-tune (`verdicts`)."""
