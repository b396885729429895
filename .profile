# Heroku runs this at the start of every dyno, one-off `heroku run` dynos included: the command
# `refiner-source` is this checkout's bin/refiner-source (see requirements.txt).
export PATH="$HOME/bin:$PATH"
