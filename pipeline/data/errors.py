"""The one exception the input side raises for bad data."""


class DataError(ValueError):
  """A dataset file, record or setting the pipeline cannot use.

  The message always names the file (and the line or record where there is one), so the
  error can be fixed without reading a traceback. Subclasses ValueError so callers that
  catch configuration errors catch this too.
  """
